"""The PostgreSQL store in the tests: a store per test, each in a schema of its own.

The database is the one on 127.0.0.1:5432, database `test` (QM_TEST_POSTGRESQL overrides
the URL). Each store a test makes gets a schema named after this run and the test's data
directory, so a test's `reopen` finds its own data again; every schema of the run is
dropped when the run ends. Without a reachable PostgreSQL (or without the driver) the
PostgreSQL parametrizations skip, saying why: a developer without PostgreSQL still runs
the rest. CI has it, so nothing skips there.
"""

from __future__ import annotations

import atexit
import functools
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qm_server.config import ServerConfig
from qm_server.store import pg_driver

URL = os.environ.get("QM_TEST_POSTGRESQL", "postgresql://postgres@127.0.0.1:5432/test")
RUN = secrets.token_hex(4)
_schemas: dict[Path, str] = {}


@functools.cache
def unavailable() -> str:
    """Why the PostgreSQL tests cannot run here; "" when they can."""
    if pg_driver.MISSING is not None:
        return f"the PostgreSQL driver is not installed ({pg_driver.MISSING})"
    try:
        with pg_driver.psycopg.connect(URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except pg_driver.psycopg.Error as exc:
        return f"no PostgreSQL at {URL} ({str(exc).strip()})"
    atexit.register(_drop_schemas)
    return ""


def skip_unless_available() -> None:
    reason = unavailable()
    if reason:
        pytest.skip(reason)


def schema_of(data_dir: Path) -> str:
    """The schema of the test whose data directory this is (the same on every call)."""
    if data_dir not in _schemas:
        _schemas[data_dir] = f"qm_test_{RUN}_{len(_schemas)}"
    return _schemas[data_dir]


def pg_store(data_dir: Path, **options: Any) -> Any:
    """A PgStore for the test of `data_dir` (options as PgStore's: clock, timed, ...)."""
    skip_unless_available()
    from qm_server.store.pg_store import PgStore

    return PgStore(URL, schema_of(data_dir), **options)


def pg_config(data_dir: Path, **fields: Any) -> ServerConfig:
    """A configuration that points a server or `qm-server user` at the test's schema."""
    skip_unless_available()
    return ServerConfig(data_dir=data_dir, store=URL, store_schema=schema_of(data_dir), **fields)


def _drop_schemas() -> None:
    if not _schemas:
        return
    with pg_driver.psycopg.connect(URL, autocommit=True) as conn:
        for schema in _schemas.values():
            conn.execute(
                pg_driver.psycopg.sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                    pg_driver.psycopg.sql.Identifier(schema)
                )
            )


PgFactory = Callable[..., Any]
