"""The PostgreSQL driver, an optional extra: imported here only, so that a server without
it runs the embedded store as before, and one asked for PostgreSQL without it fails at
start with one line that says what to install (backends.py)."""

from __future__ import annotations

from typing import Any, TypeAlias

try:
    import psycopg
    import psycopg.errors
    import psycopg.sql
    import psycopg_pool
except ImportError as exc:  # pragma: no cover - the tests install the extra
    MISSING: str | None = str(exc)
else:
    MISSING = None

INSTALL_HINT = (
    "the PostgreSQL store needs the driver: pip install 'queue-manager[postgresql]' "
    "(psycopg[binary,pool])"
)

# One connection of the store's pool, as every PostgreSQL module types it.
Conn: TypeAlias = "psycopg.AsyncConnection[tuple[Any, ...]]"

__all__ = ["INSTALL_HINT", "MISSING", "Conn", "psycopg", "psycopg_pool"]
